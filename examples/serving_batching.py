# examples/serving_batching.py
"""Dynamic batching: concurrent calls are grouped into one call with a list."""

import fleet


@fleet.deployment(max_ongoing_requests=64)
class Embedder:
    @fleet.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def __call__(self, texts: list[str]) -> list[dict]:
        # One vectorised model call for the whole batch; one result per caller.
        return [{"text": t, "length": len(t), "batch_size": len(texts)} for t in texts]


if __name__ == "__main__":
    fleet.start(http_options={"port": 0})
    handle = fleet.run(Embedder.bind(), name="embedder", route_prefix="/embed")
    responses = [handle.remote(f"text number {i}") for i in range(16)]
    results = [r.result() for r in responses]
    assert [r["text"] for r in results] == [f"text number {i}" for i in range(16)]
    print("largest batch:", max(r["batch_size"] for r in results))
    fleet.shutdown()
