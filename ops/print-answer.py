"""Prints a `fleet infer` answer for a person: who embedded the job and how long it took, then
each text with the head of its vector. The answer (JSON) is in $ANSWER, the texts are the
arguments; $ELAPSED_MS, when set, is the caller's own round-trip time."""
import json
import os
import sys

result = json.loads(os.environ["ANSWER"])
timings = result["timings"]
took = f" in {int(os.environ['ELAPSED_MS'])} ms" if os.environ.get("ELAPSED_MS") else ""
print(f"job {result['job_id']} embedded by {result['worker']}{took} "
      f"(queue {timings['queue_ms']} ms, inference {timings['inference_ms']} ms)")
for text, vector in zip(sys.argv[1:], result["output"]["vectors"]):
    head = ", ".join(f"{x:+.4f}" for x in vector[:6])
    print(f"  [{head}, ...] ({len(vector)} dims)  {text}")
