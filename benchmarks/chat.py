"""A conversation about a photo (issue 31) with the real BLIP-2 OPT-2.7b architecture (random
weights, built in memory as benchmarks/vqa.py builds it): per turn, the time to the first
streamed piece of the answer and the pieces a second after it, as the prompt grows with the
turns before. Random weights never end an answer, so each runs its whole budget
(`--tokens`). The baseline is the same turn answered whole (`Answerer.chat`), measured in the
same run: streaming costs nothing extra, it only shows the answer sooner.

    python benchmarks/chat.py [--turns 3] [--tokens 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import photos  # noqa: E402
from benchmarks.vqa import QUESTIONS, built  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from PIL import Image

    from searchengine.models.conversation import Decoding, Turn
    from searchengine.models.vqa import Answerer, clipped

    device, _, model, processor = built(args.device)
    image = Image.open(photos(1)[0]).convert("RGB")
    answerer = Answerer("blip2-opt-2.7b (random)", model, processor, device=device)
    decoding = Decoding(max_new_tokens=args.tokens)
    answerer.chat(image, [], QUESTIONS[0], Decoding(max_new_tokens=1))  # warm-up
    turns: list[Turn] = []
    for n in range(args.turns):
        question = QUESTIONS[n % len(QUESTIONS)]
        t0 = time.perf_counter()
        whole = answerer.chat(image, turns, question, decoding)
        whole_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        first, pieces = None, []
        for piece in answerer.stream(image, turns, question, decoding):
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(piece)
        total = time.perf_counter() - t0
        assert clipped("".join(pieces)) == whole.answer
        rate = (len(pieces) - 1) / (total - first) if len(pieces) > 1 and total > first else 0.0
        prompt_tokens = len(processor.tokenizer(" ".join(f"Question: {t.question} Answer: {t.answer}." for t in turns))["input_ids"])
        print(f"turn {n + 1} ({len(turns)} before, ~{prompt_tokens} prompt tokens of them): first piece {first * 1000:.0f} ms, "
              f"{rate:.2f} pieces/s after it, whole {total * 1000:.0f} ms streamed against {whole_ms:.0f} ms unstreamed "
              f"({total * 1000 / whole_ms:.2f}x)", flush=True)
        turns.append(Turn(question, whole.answer))


if __name__ == "__main__":
    main()
