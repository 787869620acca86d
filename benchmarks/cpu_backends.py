"""CPU inference backends for the query-time models, on the real-size blip2-itm-vit-g
architecture (random weights): PyTorch eager (what ships), torch.compile, ONNX Runtime and
OpenVINO, for the text encoder (one query's ITC vector) and ITM (re-ranking 20 candidates
from their cached ViT outputs). Each backend's outputs are checked against eager (ITC cosine
per vector, ITM |dp|) and timed (median of the calls after a warm-up), with its ratio to eager
in the same run. ONNX Runtime and OpenVINO are optional here.

The query is timed at the length bert-base-uncased, the real checkpoint's tokenizer, gives it
(10 tokens); the random model's toy vocabulary would spell "running" letter by letter (16).
torch's dynamic int8 quantization of the Q-Former is timed too (measured, not shipped: it
leaves the parity bound). The last line compares the floating-point rate ITM of 20 needs for
1.5 s with this machine's best fp32 matrix-multiply rate, measured in the same run:

    pip install onnxruntime openvino onnx
    python benchmarks/cpu_backends.py --repeat 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_ms, model_dir  # noqa: E402

QUERY = "a dog running on a beach at sunset"
QUERY_TOKENS = 10  # [CLS] a dog running on a beach at sunset [SEP], in bert-base-uncased


def itm_macs(config, patches: int, tokens: int, candidates: int) -> float:
    """Multiply-adds of ITM for `candidates` images of `patches` ViT outputs and one text of
    `tokens` tokens: the Q-Former over queries + text (self-attention, feed-forward) and,
    every cross_attention_frequency layers, the queries' cross-attention to the ViT output."""
    q = config.qformer_config
    h, inner, layers, queries = q.hidden_size, q.intermediate_size, q.num_hidden_layers, config.num_query_tokens
    seq = queries + tokens
    per_layer = seq * (4 * h * h + 2 * h * inner) + 2 * seq * seq * h
    cross = queries * 2 * h * h + patches * 2 * q.encoder_hidden_size * h + 2 * queries * patches * h
    n_cross = len(range(0, layers, q.cross_attention_frequency))
    return float(candidates) * (layers * per_layer + n_cross * cross)


def gemm_gflops(rows: int, inner: int, cols: int, repeat: int = 10) -> float:
    """This machine's best fp32 matrix-multiply rate (GFLOP/s) at one shape."""
    import torch

    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * rows * inner * cols / best / 1e9


def int8_copy(module):
    """A copy of `module` with its Linear layers in torch's dynamic int8 (measured, not shipped)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it takes minutes)")
    parser.add_argument("--images", type=int, default=0,
                        help="also time the image side (ViT + ITC, what indexing runs) on a batch of this many images")
    parser.add_argument("--images-only", action="store_true", help="time the image side alone")
    parser.add_argument("--tokens", type=int, default=QUERY_TOKENS,
                        help="the query's length in tokens (0: as the random model's toy tokenizer splits it)")
    args = parser.parse_args()
    import torch

    from searchengine.models.retrieval import RetrievalModel

    threads = torch.get_num_threads()
    model = RetrievalModel.load(str(model_dir("real")), device="cpu", dtype="float32")
    model.model.requires_grad_(False)  # exporters take weights as constants
    if args.images_only:
        image_side(model, args.images or 8, threads, Path(tempfile.mkdtemp(prefix="backends-")))
        return
    tok = model.tokenize([QUERY])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if args.tokens:  # the toy tokenizer's ids, cut to the real tokenizer's length, ending in [SEP]
        ids = torch.cat([ids[:, : args.tokens - 1], ids[:, -1:]], dim=1)
        mask = torch.ones_like(ids)
    rng = np.random.default_rng(0)
    vit = torch.from_numpy(rng.standard_normal((args.candidates, *model.vit_shape)).astype(np.float32))

    class Text(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return model.text_features(input_ids, attention_mask)

    class Itm(torch.nn.Module):
        def forward(self, input_ids, attention_mask, vit):
            return torch.softmax(model.itm_logits(input_ids, attention_mask, vit), dim=-1)[:, 1]

    text, itm = Text().eval(), Itm().eval()
    n = args.candidates
    itm_inputs = (ids.expand(n, -1).contiguous(), mask.expand(n, -1).contiguous(), vit)
    with torch.inference_mode():
        ref_text = text(ids, mask).numpy()
        ref_itm = itm(*itm_inputs).numpy()
    rows = []

    def record(name: str, run_text, run_itm, setup_s: float) -> None:
        got_text, got_itm = np.asarray(run_text()), np.asarray(run_itm())
        cos = float((got_text * ref_text).sum() / (np.linalg.norm(got_text) * np.linalg.norm(ref_text)))
        dp = float(np.abs(got_itm - ref_itm).max())
        rows.append((name, median_ms(run_text, args.repeat), median_ms(run_itm, max(3, args.repeat // 3)), cos, dp, setup_s))
        print(f"  measured {name}", flush=True)

    with torch.inference_mode():
        record("eager", lambda: text(ids, mask).numpy(), lambda: itm(*itm_inputs).numpy(), 0.0)
    eager_qformer = model.model.qformer
    model.model.qformer = int8_copy(eager_qformer)
    with torch.inference_mode():
        record("int8 dynamic", lambda: text(ids, mask).numpy(), lambda: itm(*itm_inputs).numpy(), 0.0)
    model.model.qformer = eager_qformer
    compiled = {}
    for name, module, inputs in () if args.no_compile else (("text", text, (ids, mask)), ("itm", itm, itm_inputs)):
        try:
            t = time.perf_counter()
            fn = torch.compile(module)
            with torch.inference_mode():
                fn(*inputs)  # compiles
            compiled[name] = (fn, time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - a backend that fails here is reported, not fatal
            print(f"  torch.compile of {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if compiled:
        with torch.inference_mode():
            ctext = compiled.get("text", (text, 0.0))[0]
            citm = compiled.get("itm", (itm, 0.0))[0]
            label = "torch.compile" + ("" if len(compiled) == 2 else f" ({next(iter(compiled))} only)")
            record(label, lambda: ctext(ids, mask).numpy(), lambda: citm(*itm_inputs).numpy(), sum(c[1] for c in compiled.values()))
    work = Path(tempfile.mkdtemp(prefix="backends-"))
    exports: dict[str, tuple[Path, dict, float]] = {}
    for name, module, inputs, names, axes in (
        ("text", text, (ids, mask), ["input_ids", "attention_mask"], {"input_ids": {1: "t"}, "attention_mask": {1: "t"}}),
        ("itm", itm, itm_inputs, ["input_ids", "attention_mask", "vit"],
         {"input_ids": {0: "n", 1: "t"}, "attention_mask": {0: "n", 1: "t"}, "vit": {0: "n"}}),
    ):
        try:
            t = time.perf_counter()
            torch.onnx.export(module, inputs, work / f"{name}.onnx", input_names=names, output_names=["out"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
            exports[name] = (work / f"{name}.onnx", {k: v.numpy() for k, v in zip(names, inputs)}, time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001
            print(f"  ONNX export of {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def eager_itm():
        with torch.inference_mode():
            return itm(*itm_inputs).numpy()

    def backend(label: str, make) -> None:
        """`make(path) -> callable(feeds) -> output`, for each exported model; eager for the rest."""
        try:
            t = time.perf_counter()
            runs = {name: (make(path), feeds) for name, (path, feeds, _) in exports.items()}
            setup = time.perf_counter() - t + sum(e[2] for e in exports.values())
            run_text = (lambda: runs["text"][0](runs["text"][1])) if "text" in runs else (lambda: text(ids, mask).detach().numpy())
            run_itm = (lambda: runs["itm"][0](runs["itm"][1])) if "itm" in runs else eager_itm
            record(label + ("" if len(runs) == 2 else " (text only)"), run_text, run_itm, setup)
        except Exception as e:  # noqa: BLE001
            print(f"  {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    if exports:
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads

            def ort_run(path):
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                return lambda feeds: session.run(None, feeds)[0]

            backend("onnxruntime", ort_run)
        except ImportError:
            print("  onnxruntime is not installed")
        try:
            import openvino as ov

            core = ov.Core()
            core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})

            def ov_run(path):
                compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                return lambda feeds: compiled(feeds)[0]

            backend("openvino", ov_run)
        except ImportError:
            print("  openvino is not installed")
    base_text, base_itm = rows[0][1], rows[0][2]
    print(f"\n{threads} threads; text: one query ({ids.shape[1]} tokens); ITM: {n} candidates from cached ViT outputs")
    print(f"{'backend':15s} {'text ms':>8s} {'x eager':>8s} {'ITM ms':>8s} {'x eager':>8s} {'ITC cos':>10s} {'ITM |dp|':>9s} {'setup s':>8s}")
    for name, tt, ti, cos, dp, setup in rows:
        print(f"{name:15s} {tt:8.1f} {base_text / tt:8.2f} {ti:8.0f} {base_itm / ti:8.2f} {cos:10.7f} {dp:9.1e} {setup:8.1f}")
    # The rate at ITM's largest multiply: the cross-attention's keys for every candidate's patches.
    patches, width = model.vit_shape
    macs = itm_macs(model.model.config, patches, ids.shape[1], n)
    rate = gemm_gflops(n * patches, width, model.model.config.qformer_config.hidden_size)
    best_itm = min(r[2] for r in rows if r[4] <= 1e-3)  # the fastest within the parity bound
    print(f"ITM of {n}: {2 * macs / 1e9:.0f} GFLOP. 1.5 s needs {2 * macs / 1.5e9:.0f} GFLOP/s; this machine's best "
          f"fp32 GEMM runs at {rate:.0f}; eager reached {2 * macs / base_itm / 1e6:.0f}, the fastest at parity "
          f"{2 * macs / best_itm / 1e6:.0f}")
    if args.images:
        image_side(model, args.images, threads, work)


def image_side(model, n: int, threads: int, work: Path) -> None:
    """ViT + ITC of `n` images (one indexing batch): eager against torch's dynamic int8, ONNX
    Runtime and OpenVINO, with the ITC cosine per vector and the ViT output's largest difference."""
    import torch

    class Images(torch.nn.Module):
        def forward(self, pixel_values):
            vit = model.model.vision_model(pixel_values=pixel_values).last_hidden_state
            return model.image_features(vit), vit

    images = Images().eval()
    pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((n, 3, model.image_size, model.image_size)).astype(np.float32))
    with torch.inference_mode():
        ref_itc, ref_vit = (t.numpy() for t in images(pixels))
    results = [("eager", median_ms(lambda: images(pixels), 2), 1.0, 0.0, 0.0)]
    t = time.perf_counter()
    path = work / "images.onnx"
    with torch.no_grad():
        torch.onnx.export(images, (pixels,), str(path), input_names=["pixel_values"], output_names=["itc", "vit"],
                          dynamic_axes={"pixel_values": {0: "n"}}, opset_version=17, dynamo=False)
    export_s = time.perf_counter() - t
    feeds = {"pixel_values": pixels.numpy()}

    def check(name, run, setup):
        itc, vit = run()
        cos = float((np.asarray(itc) * ref_itc).sum(-1).min())
        results.append((name, median_ms(run, 2), cos, float(np.abs(np.asarray(vit) - ref_vit).max()), setup))
        print(f"  measured {name} (images)", flush=True)

    eager = model.model.vision_model, model.model.qformer
    model.model.vision_model, model.model.qformer = (int8_copy(m) for m in eager)
    with torch.inference_mode():
        check("int8 dynamic", lambda: tuple(t.numpy() for t in images(pixels)), 0.0)
    model.model.vision_model, model.model.qformer = eager
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        t = time.perf_counter()
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        check("onnxruntime", lambda: session.run(None, feeds), export_s + time.perf_counter() - t)
    except ImportError:
        print("  onnxruntime is not installed")
    try:
        import openvino as ov

        core = ov.Core()
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
        t = time.perf_counter()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        check("openvino", lambda: (lambda r: (r[0], r[1]))(compiled(feeds)), export_s + time.perf_counter() - t)
    except ImportError:
        print("  openvino is not installed")
    base = results[0][1]
    print(f"\nimages: ViT + ITC of {n} images at {model.image_size} px")
    print(f"{'backend':15s} {'ms':>9s} {'img/s':>7s} {'x eager':>8s} {'min ITC cos':>12s} {'ViT |d|':>9s} {'setup s':>8s}")
    for name, ms, cos, dvit, setup in results:
        print(f"{name:15s} {ms:9.0f} {n * 1000 / ms:7.3f} {base / ms:8.2f} {cos:12.7f} {dvit:9.1e} {setup:8.1f}")


if __name__ == "__main__":
    main()
