"""The peer figure: sentence-transformers on PyTorch (CPU) encoding the corpus, timed like
fleet-model's `throughput` example (median of N passes after a warm-up, `encode` only).

usage: python sentence_transformers_encode.py MODEL_DIR CORPUS BATCH [RUNS]
"""

import json
import os
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def main() -> None:
    model_dir, corpus, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:256], batch_size=batch, normalize_embeddings=True)
    times = []
    for _ in range(runs):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        model.encode(texts, batch_size=batch, normalize_embeddings=True)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print(f"  batch {batch}: {wall:.2f} s wall, {cpu:.2f} s CPU ({cpu / wall:.2f} cores busy)", flush=True)
        times.append(wall)
    times.sort()
    median = times[len(times) // 2]
    n = len(texts)
    print(
        f"sentence-transformers (torch {torch.__version__}, {torch.get_num_threads()} threads) batch {batch}: "
        f"median {median:.2f} s ({times[0]:.2f}-{times[-1]:.2f}) = {n / median:.1f} texts/s "
        f"({n / times[-1]:.1f}-{n / times[0]:.1f})"
    )


if __name__ == "__main__":
    main()
