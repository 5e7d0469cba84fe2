"""The batch builder's packed buffer, unpacked, holds exactly the step's fields."""
import numpy as np
import torch

from tandem.contract.step import STEP_FIELDS, Padding, StepShape, pack
from tandem.engine.batch import build_step, table_width
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.sampling_params import SamplingParams
from tandem.worker.model_runner import unpack


def _seq(rid, prompt, outputs, blocks, row, params, pending=0):
    seq = Sequence(rid, prompt, params, seed=2**62 + int(rid), max_new_tokens=100)
    seq.output_token_ids, seq.block_ids, seq.row, seq.num_pending = list(outputs), blocks, row, pending
    return seq


def test_mixed_step_fields():
    bs = 4
    a = _seq("1", list(range(10, 20)), [], [7, 3, 9], 5, SamplingParams(temperature=0.7, top_k=8, top_p=0.9))
    b = _seq("2", [1, 2, 3], [44, 45], [2, 6], 0, SamplingParams(temperature=0), pending=1)  # last token pending
    c = _seq("3", [5, 6], [8], [4], 3, SamplingParams(temperature=1.3, min_p=0.05))
    items = [ScheduledSeq(a, 4, 6, True, 0), ScheduledSeq(b, 5, 1, True, 3), ScheduledSeq(c, 2, 1, True, 1)]
    step = build_step(SchedulerOutput(9, items), bs)
    f = unpack(torch.from_numpy(step.data), step.shape)
    assert step.data.size == step.shape.num_words and set(f) == {field.name for field in STEP_FIELDS}
    assert f.input_ids.tolist() == [14, 15, 16, 17, 18, 19, -(0 + 1), 8]
    assert f.positions.tolist() == [4, 5, 6, 7, 8, 9, 5, 2]
    # position p of a sequence lives in block_ids[p // bs] at offset p % bs
    assert f.slot_mapping.tolist() == [3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 9 * 4 + 1,
                                       6 * 4 + 1, 4 * 4 + 2]
    assert f.query_start.tolist() == [0, 6, 7, 8] and f.seq_lens.tolist() == [10, 6, 3]
    assert f.block_tables.view(3, 3).tolist() == [[7, 3, 9], [2, 6, 0], [4, 0, 0]]
    assert f.logits_indices.tolist() == [5, 6, 7] and f.sample_rows.tolist() == [5, 0, 3]
    assert f.seeds.tolist() == [2**62 + 1, 2**62 + 2, 2**62 + 3] and f.gen_index.tolist() == [0, 3, 1]
    assert f.top_k.tolist() == [8, 0, 0]
    assert f.temperature.tolist() == torch.tensor([0.7, 0.0, 1.3]).tolist()  # exact float32 round trip
    assert f.top_p.tolist() == torch.tensor([0.9, 1.0, 1.0]).tolist()
    assert f.min_p.tolist() == torch.tensor([0.0, 0.0, 0.05]).tolist()
    assert step.shape.max_q == 6 and step.sampler.any_random and step.sampler.need_sort


def test_decode_step_padded_to_a_graph_shape():
    a = _seq("1", [1, 2], [3], [5], 1, SamplingParams(temperature=0))
    for pad, width in ((Padding(4, 4, 6, padding_row=99), 1), (Padding(4, 4, 6, padding_row=99, full_table=True), 6)):
        step = build_step(SchedulerOutput(0, [ScheduledSeq(a, 2, 1, True, 1)]), 4, pad)
        f = unpack(torch.from_numpy(step.data), step.shape)
        assert (step.shape.num_tokens, step.shape.num_seqs, step.shape.num_sampled, step.shape.max_blocks) == \
            (4, 4, 4, width)
        assert f.input_ids.tolist() == [3, 0, 0, 0] and f.slot_mapping.tolist() == [5 * 4 + 2, 0, 0, 0]
        assert f.seq_lens.tolist() == [3, 1, 1, 1] and f.sample_rows.tolist() == [1, 99, 99, 99]
        assert f.logits_indices.tolist() == [0, 1, 2, 3] and f.query_start.tolist() == [0, 1, 2, 3, 4]
        assert f.block_tables.view(4, width)[:, 0].tolist() == [5, 0, 0, 0] and f.temperature.tolist() == [0.0] * 4
        assert not f.block_tables.view(4, width)[:, 1:].any() and not step.sampler.any_random


def test_graph_padded_steps_ship_only_the_columns_they_use():
    """Up to the graph's width, a padded step's table is its widest sequence's blocks rounded up to
    a power of two: few shapes, and no gather of max_model_len columns per sequence every step."""
    assert [table_width(n, Padding(8, 8, 40)) for n in (1, 2, 3, 5, 16, 17, 33, 40)] == [1, 2, 4, 8, 16, 32, 40, 40]
    assert table_width(3, Padding(8, 8, 40, full_table=True)) == 40 and table_width(3, None) == 3
    rng = np.random.default_rng(3)
    for _ in range(20):
        lens = rng.integers(1, 60, int(rng.integers(1, 6)))  # blocks held by each sequence
        seqs = [_seq(str(i + 1), [1, 2], [3] * (int(n) * 4 - 3), list(rng.integers(1, 500, int(n))), i,
                     SamplingParams(temperature=0)) for i, n in enumerate(lens)]
        items = [ScheduledSeq(s, s.num_tokens - 1, 1, True, 1) for s in seqs]
        narrow, wide = (build_step(SchedulerOutput(0, items), 4, Padding(8, 8, 128, 99, full)) for full in (False, True))
        w = narrow.shape.max_blocks
        assert lens.max() <= w == table_width(int(lens.max()), Padding(8, 8, 128)) < 2 * lens.max()
        assert narrow.shape.fits_graph(wide.shape) and wide.shape.max_blocks == 128
        assert not wide.shape.fits_graph(narrow.shape)
        f, g = (unpack(torch.from_numpy(s.data), s.shape) for s in (narrow, wide))
        assert torch.equal(f.block_tables.view(8, w), g.block_tables.view(8, 128)[:, :w])
        assert not g.block_tables.view(8, 128)[:, w:].any()
        for field in STEP_FIELDS:
            if field.name != "block_tables":
                assert torch.equal(f[field.name], g[field.name]), field.name


def test_pack_and_unpack_are_inverse_for_random_fields():
    """Every field at its own offset: fill each with distinct random values and read them back."""
    rng = np.random.default_rng(7)
    shape = StepShape(num_tokens=11, num_seqs=3, num_sampled=2, max_q=7, max_blocks=5)
    arrays = {f.name: (rng.integers(-2**40, 2**40, shape.size(f.per)) if f.dtype is np.int64
                       else rng.standard_normal(shape.size(f.per)).astype(np.float32)) for f in STEP_FIELDS}
    f = unpack(torch.from_numpy(pack(arrays, shape)), shape)
    for field in STEP_FIELDS:
        assert np.array_equal(f[field.name].numpy(), arrays[field.name]), field.name


def test_mixed_step_padded_to_a_token_bucket():
    """Piecewise graphs pad only the tokens (to the bucket); sequences, samples and tables stay."""
    a = _seq("1", list(range(10, 20)), [], [7, 3, 9], 5, SamplingParams(temperature=0))
    b = _seq("2", [1, 2, 3], [44], [2], 0, SamplingParams(temperature=0))
    items = [ScheduledSeq(a, 4, 6, True, 0), ScheduledSeq(b, 3, 1, True, 1)]
    step = build_step(SchedulerOutput(1, items), 4, Padding(num_tokens=16))
    f = unpack(torch.from_numpy(step.data), step.shape)
    assert (step.shape.num_tokens, step.shape.num_seqs, step.shape.num_sampled) == (16, 2, 2)
    assert f.input_ids.tolist() == [14, 15, 16, 17, 18, 19, 44] + [0] * 9
    assert f.slot_mapping.tolist()[7:] == [0] * 9 and f.positions.tolist()[7:] == [0] * 9
    assert f.query_start.tolist() == [0, 6, 7] and f.logits_indices.tolist() == [5, 6]


def _decode_step(params: list[SamplingParams], pad: Padding):
    seqs = [_seq(str(i + 1), [1, 2, 3], [4 + i], [5 + i], i, p) for i, p in enumerate(params)]
    return build_step(SchedulerOutput(0, [ScheduledSeq(s, 3, 1, True, 1) for s in seqs]), 4, pad)


def test_graph_fields_are_the_unpacked_step_whatever_its_lists():
    """A decode graph's views, made once at capture, read every step of its shape like ``unpack``."""
    from tandem.engine.startup_steps import decode_step
    from tandem.worker.model_runner import GraphFields

    pad = Padding(4, 4, 6, padding_row=99, full_table=True)
    capture = decode_step(pad, 4)
    plain = _decode_step([SamplingParams(temperature=0.5, presence_penalty=0.3)] * 2, pad)
    biased = _decode_step([SamplingParams(logit_bias={7: 1.5, 9: -2.0}),
                           SamplingParams(temperature=0.7, logit_bias={3: 0.5})], pad)
    assert plain.shape.graph_key == biased.shape.graph_key == capture.shape.graph_key and biased.shape.num_bias == 3
    for static_words in (capture.data.size + 64, capture.data.size):  # room for the lists, or none
        static = torch.zeros(static_words, dtype=torch.int64)
        fields = GraphFields(static, capture.shape)
        for step in (plain, biased, plain, biased):
            data = torch.from_numpy(step.data)
            got, want = fields.stage(data, step.shape), unpack(data, step.shape)
            for field in STEP_FIELDS:
                assert torch.equal(getattr(got, field.name), want[field.name]), field.name
            assert torch.equal(static[:fields.int_words], data[:fields.int_words])  # what the graph reads
        assert fields.stage(torch.from_numpy(plain.data), plain.shape) is fields.stage(torch.from_numpy(plain.data),
                                                                                        plain.shape)


def test_a_narrower_table_is_staged_where_the_graph_reads_it():
    """A step that ships fewer table columns than the graph has: the graph's inputs hold what the
    full-width step would put there, in every column a sequence's length reaches (the rest keep an
    earlier step's blocks, which no kernel reads), and the sampling stage sees the step's fields."""
    from tandem.engine.startup_steps import decode_step
    from tandem.worker.model_runner import GraphFields

    rng = np.random.default_rng(5)
    bs, graph_width = 4, 64
    capture = decode_step(Padding(8, 8, graph_width, padding_row=99), bs)
    for static_words in (capture.data.size + 64, capture.data.size):
        static = torch.zeros(static_words, dtype=torch.int64)
        fields = GraphFields(static, capture.shape)
        for _ in range(12):
            n = int(rng.integers(1, 9))
            seqs = [_seq(str(i + 1), [1, 2], [3] * int(rng.integers(0, 100)), [], i,
                         SamplingParams(temperature=float(rng.random()), logit_bias={5: 1.0} if i == 1 else None))
                    for i in range(n)]
            for seq in seqs:
                seq.block_ids = rng.integers(1, 1000, -(-seq.num_tokens // bs)).tolist()
            items = [ScheduledSeq(s, s.num_tokens - 1, 1, True, 1) for s in seqs]
            narrow, wide = (build_step(SchedulerOutput(0, items), bs, Padding(8, 8, graph_width, 99, full))
                            for full in (False, True))
            fields.stage(torch.from_numpy(wide.data[::-1].copy()), wide.shape)  # an earlier step, other blocks
            data = torch.from_numpy(narrow.data)
            got = fields.stage(data, narrow.shape)
            for field in STEP_FIELDS:
                assert torch.equal(getattr(got, field.name), unpack(data, narrow.shape)[field.name]), field.name
            want = unpack(torch.from_numpy(wide.data), wide.shape)
            for name, view in fields.ints.items():  # what the graph reads
                if name != "block_tables":
                    assert torch.equal(view, want[name]), name
            used = -(-want.seq_lens // bs)  # the columns a kernel reads, per sequence
            assert int(used.max()) <= narrow.shape.max_blocks < graph_width
            table, full = fields.table, want.block_tables.view(8, graph_width)
            for row, k in enumerate(used.tolist()):
                assert torch.equal(table[row, :k], full[row, :k])


def test_every_field_starts_16_byte_aligned_whatever_the_sizes():
    """Kernels read the fields in place, and Triton compiles a variant per pointer alignment: a
    field's alignment must not depend on the step's sizes."""
    from tandem.contract.step import FIELDS_BY_NAME, field_offsets

    rng = np.random.default_rng(0)
    for _ in range(200):
        t, s, k, q, b, *lists = (int(x) for x in rng.integers(1, 40, 8))
        shape = StepShape(t, s, k, q, b, *lists)
        offsets = field_offsets(shape)
        for name, (start, _) in offsets.items():
            if name != "_end":
                assert start * np.dtype(FIELDS_BY_NAME[name].dtype).itemsize % 16 == 0, (name, shape)
        data = torch.from_numpy(pack({f.name: np.ones(shape.size(f.per), f.dtype) for f in STEP_FIELDS}, shape))
        views = unpack(data, shape)
        assert all(views[f.name].data_ptr() % 16 == 0 for f in STEP_FIELDS if shape.size(f.per))
