"""Hand-run benchmark of batch-1 decoding on a CPU: fp32, bf16 and int8 weights against their own weight-read floor,
and llama.cpp (through llama-cpp-python) on the same language model converted to GGUF.

    python benchmarks/cpu.py [--converter PATH/convert_hf_to_gguf.py]

It is not a test: it prints one table. All figures come from the same random checkpoint (the perf config of
``benchmarks/runtime.py``: hidden 768 x 8 layers, MLP 2048, the first 8,192 ranks of Qwen's vocabulary):

* ours, per precision (fp32, bf16, int8 = torchao weight-only int8 on bf16 activations): prompt processing (a
  128-token prefill) and decoding tokens/s of ``BelleVL.chat`` (64 new tokens minus 16, greedy), and the
  weight-read floor of that precision measured in the same run (every decoder linear layer once on one token);
* llama.cpp: the language model alone (the ``transformer.visual.*`` tensors and the config's ``visual`` block are
  left out of a copy of the checkpoint, which is all llama.cpp's QWEN architecture has) converted with llama.cpp's
  own ``convert_hf_to_gguf.py`` to f32, bf16 and q8_0, then prompt processing and decoding tokens/s through
  ``llama_cpp.Llama`` (``eval`` of the same 128 ids, then 48 greedy single-token steps), with as many threads as
  torch uses.

The converter ships in llama.cpp's source (e.g. ``vendor/llama.cpp/`` inside the llama-cpp-python sdist:
``pip download --no-deps --no-binary :all: llama-cpp-python``); it runs in this process, after
``belle_vl_tools`` has registered its tokenizer with ``AutoTokenizer`` (the converter reads the vocabulary
through it). Without llama-cpp-python, the ``gguf`` package or the converter, the llama.cpp rows say what is
missing and the rest still runs.

Medians of interleaved repeats: the precisions take turns, so that a change of the machine's load hits each alike.
On a shared machine the absolute figures move with the load; the ratios measured side by side move less.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import PERF_LM, STORY, VISUAL, busy_cores, vocab_prefix, weight_floor  # noqa: E402

from belle_vl_tools import BelleVL  # noqa: E402
from belle_vl_tools.modeling_qwen_vl import CACHE_FIELD, QWenCache  # noqa: E402
from belle_vl_tools.testing import write_tiny_checkpoint  # noqa: E402

PROMPT = 128
SHORT, LONG = 16, 64
PRECISIONS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8")}
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}
#: "off": True when the vocabulary is cut (--vocab-ranks), see :func:`convert`.
KEEP_PRE_TOKENIZER_CHECK: dict[str, bool] = {"off": False}


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model: Any) -> int:
    """Bytes the decoder's linear layers hold (int8 data and scales for quantized weights)."""
    total = 0
    for module in [*model.transformer.h.modules(), model.lm_head]:
        if not isinstance(module, torch.nn.Linear):
            continue
        for param in (module.weight, module.bias):
            if param is None:
                continue
            inner = [getattr(param, name) for name in ("qdata", "scale") if hasattr(param, name)]
            total += sum(t.numel() * t.element_size() for t in inner) or param.numel() * param.element_size()
    return total


class Ours:
    """One precision of the runtime: its prefill, decoding step and weight floor."""

    def __init__(self, folder: Path, dtype: str, quantize: str | None) -> None:
        self.runtime = BelleVL.from_pretrained(folder, dtype=dtype, quantize=quantize, prefix_cache_size=0)
        self.model = self.runtime.model
        self.ids = torch.randint(0, 8000, (1, PROMPT))
        self.chat(2)

    def chat(self, n: int) -> None:
        self.runtime.chat(STORY, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    def prefill(self) -> float:
        with torch.inference_mode():
            cache = QWenCache(config=self.model.config)
            return timed(
                lambda: self.model(input_ids=self.ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
            )

    def step(self) -> float:
        return (timed(lambda: self.chat(LONG)) - timed(lambda: self.chat(SHORT))) / (LONG - SHORT)

    def floor(self) -> float:
        return weight_floor(self.model, 10)[0]


def lm_only_copy(folder: Path, out: Path) -> Path:
    """The checkpoint without its vision tower: config.json without ``visual``, no ``transformer.visual.*``; no
    ``auto_map`` either, so that ``AutoTokenizer`` (in the converter) takes the tokenizer registered here instead of
    looking for the reference's code files; ``rms_norm_eps`` named as llama.cpp's QWEN loader needs it."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("visual", None)
    config.pop("auto_map", None)
    # Qwen's norms are RMSNorms with epsilon layer_norm_epsilon; llama.cpp's QWEN loader reads the RMS key, which
    # the converter writes from rms_norm_eps only
    config["rms_norm_eps"] = config.get("layer_norm_epsilon", 1e-6)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {
        k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("transformer.visual")
    }
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name in os.listdir(folder):
        if name not in ("config.json", "model.safetensors") and not name.startswith("model"):
            path = folder / name
            if path.suffix == ".json":
                data = json.loads(path.read_text())
                data.pop("auto_map", None) if isinstance(data, dict) else None
                (out / name).write_text(json.dumps(data, indent=2))
            elif path.is_file():
                shutil.copy(path, out / name)
    return out


def convert(converter: Path, folder: Path, outtype: str, out: Path) -> None:
    """Run llama.cpp's converter in this process (our tokenizer is registered with AutoTokenizer here)."""
    sys.path.insert(0, str(converter.parent))
    sys.path.insert(0, str(converter.parent / "gguf-py"))
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if args_vocab_ranks := KEEP_PRE_TOKENIZER_CHECK.get("off"):
        # A vocabulary cut to its first ranks hashes to no pre-tokenizer the converter knows; the benchmark feeds
        # token ids and never has llama.cpp split text, so Qwen's own ("qwen2") is written without the check.
        base = sys.modules.get("conversion.base")
        text_model = getattr(base, "TextModel", None) or getattr(module, "TextModel", None)
        if text_model is not None and args_vocab_ranks:
            text_model.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    argv = sys.argv
    sys.argv = [str(converter), str(folder), "--outtype", outtype, "--outfile", str(out)]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module.main()
    finally:
        sys.argv = argv


def llama_missing(converter: Path | None) -> str | None:
    missing = [name for name in ("llama_cpp", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install llama-cpp-python gguf)"
    if converter is None or not converter.is_file():
        return "no converter: pass --converter PATH/convert_hf_to_gguf.py (from llama.cpp's source)"
    return None


class Llama:
    """llama.cpp on one GGUF file: prefill of the same ids, then greedy single-token steps."""

    def __init__(self, path: Path, threads: int) -> None:
        from llama_cpp import Llama as Model

        self.model = Model(
            str(path),
            n_ctx=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=bool(os.environ.get("LLAMA_VERBOSE")),
        )
        self.ids = torch.randint(0, 8000, (PROMPT,)).tolist()

    def prefill(self) -> float:
        self.model.reset()
        return timed(lambda: self.model.eval(self.ids))

    def step(self) -> float:
        self.model.reset()
        self.model.eval(self.ids)
        token = self.ids[-1]
        steps = LONG - SHORT

        def run() -> None:
            nonlocal token
            for _ in range(steps):
                self.model.eval([token])
                token = int(self.model.scores[self.model.n_tokens - 1].argmax())

        return timed(run) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--converter", type=Path, default=None, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--vocab-ranks", type=int, default=8192, help="first N ranks of qwen.tiktoken (0: all)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    KEEP_PRE_TOKENIZER_CHECK["off"] = bool(args.vocab_ranks)
    busy = busy_cores()
    print(
        f"CPU decoding benchmark: torch {torch.__version__}, {threads} threads, "
        f"{os.cpu_count()} cores, other work on about {busy:.1f} cores at the start (timings move with it)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab = vocab_prefix(Path(tmp), args.vocab_ranks)
        folder = write_tiny_checkpoint(Path(tmp) / "perf", seed=0, visual=VISUAL, vocab_file=vocab, **PERF_LM)
        ours = {name: Ours(folder, dtype, quant) for name, (dtype, quant) in PRECISIONS.items()}
        llamas: dict[str, Llama] = {}
        missing = llama_missing(args.converter)
        if missing is None:
            lm = lm_only_copy(folder, Path(tmp) / "lm-only")
            for name, outtype in GGUF_TYPES.items():
                out = Path(tmp) / f"lm-{outtype}.gguf"
                try:
                    convert(args.converter, lm, outtype, out)
                    llamas[name] = Llama(out, threads)
                except Exception as exc:  # a converter or loader failure: reported in the table
                    missing = f"{outtype}: {type(exc).__name__}: {exc}"
                    print(f"llama.cpp {outtype}: {missing}", file=sys.stderr)

        times: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.repeats):
            for name, run in ours.items():
                entry = times.setdefault(name, {"prefill": [], "step": [], "floor": []})
                entry["prefill"].append(run.prefill())
                entry["step"].append(run.step())
                entry["floor"].append(run.floor())
            for name, run in llamas.items():
                entry = times.setdefault(f"llama.cpp {GGUF_TYPES[name]}", {"prefill": [], "step": []})
                entry["prefill"].append(run.prefill())
                entry["step"].append(run.step())

        model = ours["fp32"].model
        config = model.config
        print(
            f"LM: hidden {config.hidden_size} x {config.num_hidden_layers} layers, MLP {config.intermediate_size}, "
            f"vocab {config.vocab_size}; prompt {PROMPT} tokens; decoding = ({LONG} - {SHORT} new tokens) / "
            f"{LONG - SHORT}; medians of {args.repeats} interleaved rounds\n"
        )
        header = (
            f"{'':<16} {'MB read':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'floor tok/s':>12} {'step/floor':>11}"
        )
        print(header)
        decode: dict[str, float] = {}
        for name, entry in times.items():
            prefill = PROMPT / median(entry["prefill"])
            step = median(entry["step"])
            decode[name] = 1 / step
            if "floor" in entry:
                floor = median(entry["floor"])
                mb = weight_bytes(ours[name].model) / 1e6
                row = f"{'ours ' + name:<16} {mb:8.0f} {prefill:14.0f} {1 / step:13.1f}"
                print(f"{row} {1 / floor:12.1f} {step / floor:11.2f}")
            else:
                print(f"{name:<16} {'':>8} {prefill:14.0f} {1 / step:13.1f}")
        print()
        for name, outtype in GGUF_TYPES.items():
            key = f"llama.cpp {outtype}"
            if key in decode:
                print(f"decode tok/s, ours {name} / llama.cpp {outtype}: {decode[name] / decode[key]:.2f}")
        if missing is not None:
            print(f"llama.cpp: {missing}")


if __name__ == "__main__":
    main()
