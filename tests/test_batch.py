"""The batch builder's packed buffer, unpacked, holds exactly the step's fields."""
import numpy as np
import torch

from tandem.engine.batch import Padding, build_step
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.engine.step import STEP_FIELDS, StepShape, pack
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
    step = build_step(SchedulerOutput(0, [ScheduledSeq(a, 2, 1, True, 1)]), 4, Padding(4, 4, 6, padding_row=99))
    f = unpack(torch.from_numpy(step.data), step.shape)
    assert (step.shape.num_tokens, step.shape.num_seqs, step.shape.num_sampled, step.shape.max_blocks) == (4, 4, 4, 6)
    assert f.input_ids.tolist() == [3, 0, 0, 0] and f.slot_mapping.tolist() == [5 * 4 + 2, 0, 0, 0]
    assert f.seq_lens.tolist() == [3, 1, 1, 1] and f.sample_rows.tolist() == [1, 99, 99, 99]
    assert f.logits_indices.tolist() == [0, 1, 2, 3] and f.query_start.tolist() == [0, 1, 2, 3, 4]
    assert f.block_tables.view(4, 6)[0].tolist() == [5, 0, 0, 0, 0, 0] and f.temperature.tolist() == [0.0] * 4
    assert not step.sampler.any_random


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
    from tandem.worker.memory import decode_step
    from tandem.worker.model_runner import GraphFields

    pad = Padding(4, 4, 6, padding_row=99)
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


def test_every_field_starts_16_byte_aligned_whatever_the_sizes():
    """Kernels read the fields in place, and Triton compiles a variant per pointer alignment: a
    field's alignment must not depend on the step's sizes."""
    from tandem.engine.step import FIELDS_BY_NAME, field_offsets

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
