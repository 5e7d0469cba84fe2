"""How many torch ops the host launches for a decode step's sampling stage: everything the graph
path (``DecodeGraphs.run``) does after the replay, for several batch sizes and sampler settings.

Each eager op costs the host ~5-15 us on a GPU, so this count, not the math, sets the submit cost
of a graph-replayed decode step. Usage:

    python scripts/count_step_ops.py [--device cpu|cuda] [--vocab 128256] [--batches 8 64 256]
    python scripts/count_step_ops.py --kernels --vocab 2048    # the CUDA path on a CPU (interpreted)

Cells: aten ops (of which views, which launch nothing) + Triton launches; on CUDA also the GPU
kernels the stage ran (Triton included), the host time of one call (no sync inside) and its
device time. ``--kernels`` runs the sampling stage's Triton kernels through Triton's interpreter,
so a CPU counts the ops the CUDA path launches (keep the vocabulary small: it is slow)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

if "--kernels" in sys.argv:  # before Triton is imported
    os.environ.update(TRITON_INTERPRET="1", TANDEM_SAMPLER="triton")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.contract.step import Padding, StepInputs  # noqa: E402
from tandem.engine.batch import build_step  # noqa: E402
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput  # noqa: E402
from tandem.engine.sequence import Sequence  # noqa: E402
from tandem.engine.startup_steps import decode_step as graph_capture_step  # noqa: E402
from tandem.model.loader import load_model  # noqa: E402
from tandem.sampling_params import SamplingParams  # noqa: E402
from tandem.worker.cuda_graphs import _LIST_WORDS as LIST_WORDS  # noqa: E402
from tandem.worker.kv_cache import allocate_kv_cache  # noqa: E402
from tandem.worker.model_runner import GraphFields, ModelRunner  # noqa: E402

BLOCK = 16
PENALTIES = dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3)
CASES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "top-p": dict(temperature=0.8, top_p=0.95),
    "+penalties": dict(temperature=0.8, top_p=0.95, **PENALTIES),
    "+logprobs 5": dict(temperature=0.8, top_p=0.95, logprobs=5, **PENALTIES),
    "+logit bias": dict(temperature=0.8, top_p=0.95, logprobs=5, logit_bias={7: 2.0, 99: -1.5, 200: 0.5},
                        **PENALTIES),
}
# the sampling stage's Triton kernels (counted per launch)
KERNELS = (("tandem.kernels.sampling", "_sample_kernel"), ("tandem.kernels.sampling", "_merge_splits_kernel"),
           ("tandem.kernels.top_k_top_p", "_cutoff_kernel"),
           ("tandem.kernels.logprobs", "_logprob_kernel"), ("tandem.kernels.penalties", "_keys_kernel"),
           ("tandem.kernels.penalties", "_apply_kernel"))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it; views (no kernel) separately."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


def count_triton_launches() -> Counter[str]:
    """Count each launch of the sampling stage's kernels; the interpreter's own torch calls (it copies
    tensors in and out) run outside any op counter."""
    import importlib

    from torch.utils._python_dispatch import _disable_current_modes

    launches: Counter[str] = Counter()
    for module_name, name in KERNELS:
        kernel = getattr(importlib.import_module(module_name), name)

        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            launches[_name] += 1
            with _disable_current_modes():
                return _run(*args, **kwargs)

        kernel.run = counted
    return launches


def make_runner(device: torch.device, num_rows: int, max_len: int) -> ModelRunner:
    model = load_model("random:tiny", device, torch.float32, max_len)
    cache = allocate_kv_cache(model.kv_spec, 4, BLOCK, device, torch.float32)
    return ModelRunner(model, cache, BLOCK, num_rows, max_len)


def decode_step(batch: int, params: SamplingParams, prompt_len: int, gen: int, vocab: int,
                padding_row: int) -> StepInputs:
    """A decode step of ``batch`` sequences (rows 0..batch-1), each ``prompt_len`` + ``gen`` tokens in,
    padded as a captured graph would be."""
    g = torch.Generator().manual_seed(0)
    items = []
    n_blocks = -(-(prompt_len + gen) // BLOCK)
    for i in range(batch):
        seq = Sequence(f"r{i}", torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), params, seed=i,
                       max_new_tokens=gen + 8)
        seq.output_token_ids = torch.randint(0, vocab, (gen - 1,), generator=g).tolist()
        seq.block_ids, seq.row = list(range(1, n_blocks + 1)), i
        items.append(ScheduledSeq(seq, prompt_len + gen - 1, 1, True, gen))
    return build_step(SchedulerOutput(0, items), BLOCK, Padding(batch, batch, n_blocks, padding_row))


def graph_fields(step: StepInputs, device: torch.device, padding_row: int) -> GraphFields:
    """The static input views a decode graph of this step's shape would hold (see ``DecodeGraphs``)."""
    capture = graph_capture_step(Padding(step.shape.num_seqs, step.shape.num_seqs, step.shape.max_blocks,
                                         padding_row), BLOCK)
    return GraphFields(torch.zeros(capture.data.size + LIST_WORDS, dtype=torch.int64, device=device), capture.shape)


class Stage:
    """``DecodeGraphs.run`` without the replay, for one step: stage the inputs, then the sampling stage."""

    def __init__(self, runner: ModelRunner, step: StepInputs, vocab: int) -> None:
        device = runner.device
        self.runner, self.step = runner, step
        self.data = torch.from_numpy(step.data).to(device)
        self.fields = graph_fields(step, device, runner.history.shape[0] - 1)
        self.logits = torch.randn(step.shape.num_sampled, vocab, device=device) * 3
        self.ids = torch.randint(0, vocab, (step.shape.num_tokens,), device=device)

    def __call__(self) -> torch.Tensor:
        f = self.fields.stage(self.data, self.step.shape)
        return self.runner.finish(None, self.ids, f, self.step.shape, self.step.sampler, self.logits)


def measure(stage: Stage, launches: Counter[str]) -> str:
    stage()  # warm-up (lazy initialisation, Triton compiles)
    launches.clear()
    with OpCounter() as counter:
        stage()
    cell = f"{sum(counter.ops.values())} ({counter.views})"
    if launches:
        cell += f" + {sum(launches.values())}"
    if stage.runner.device.type == "cuda":
        cell += f" / {_cuda_kernels(stage)} / {_host_us(stage):.0f} / {_device_us(stage):.0f}"
    return cell


def _cuda_kernels(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
               and "Memset" not in e.name)


def _host_us(run, repeats: int = 20) -> float:
    """Median host time of one call, each started on an idle device (launches are asynchronous)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def _device_us(run, repeats: int = 10) -> float:
    """Device time of one call: CUDA events around back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--gen", type=int, default=56)
    p.add_argument("--kernels", action="store_true", help="the CUDA path's Triton kernels, interpreted")
    p.add_argument("--verbose", action="store_true", help="print the op names of the last case")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    launches = count_triton_launches() if args.kernels or device.type == "cuda" else Counter()
    max_batch = max(args.batches)
    runner = make_runner(device, max_batch + 1, args.prompt_len + args.gen + 8)
    runner.history.random_(0, args.vocab)
    print(f"device {device}{' (Triton interpreted)' if args.kernels else ''}, vocab {args.vocab}, context "
          f"{args.prompt_len} + {args.gen}; cells: aten ops (views) + Triton launches"
          + (" / GPU kernels / host us / device us" if device.type == "cuda" else ""))
    print("| case | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("| --- |" + " --- |" * len(args.batches))
    stage = None
    for name, settings in CASES.items():
        cells = []
        for batch in args.batches:
            step = decode_step(batch, SamplingParams(max_tokens=args.gen + 8, **settings), args.prompt_len,
                               args.gen, args.vocab, padding_row=max_batch)
            stage = Stage(runner, step, args.vocab)
            cells.append(measure(stage, launches))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.verbose and stage is not None:  # which ops the fullest case launches at the largest batch
        with OpCounter() as counter:
            stage()
        print(sorted(counter.ops.items(), key=lambda kv: -kv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
