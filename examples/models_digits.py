# examples/models_digits.py
"""A scikit-learn classifier trained at start-up on its bundled digits data, served
over HTTP and called through a handle."""

import httpx
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from starlette.requests import Request

import fleet


@fleet.deployment(num_replicas=2)
class DigitClassifier:
    def __init__(self) -> None:
        images, labels = load_digits(return_X_y=True)      # 1797 8x8 images, no download
        self.model = LogisticRegression(max_iter=2000).fit(images[:1500], labels[:1500])

    async def __call__(self, request: Request) -> dict:
        pixels = np.asarray((await request.json())["pixels"], dtype=np.float64)
        if pixels.shape != (64,):
            return {"error": f"pixels must hold 64 values (8x8), got shape {pixels.shape}"}
        probs = self.model.predict_proba(pixels.reshape(1, 64))[0]
        return {"digit": int(probs.argmax()), "confidence": round(float(probs.max()), 3)}

    async def predict(self, images: np.ndarray) -> list[int]:
        return [int(d) for d in self.model.predict(images)]


if __name__ == "__main__":
    fleet.start(http_options={"port": 0})
    handle = fleet.run(DigitClassifier.bind(), name="digits", route_prefix="/digits")
    port = fleet.status()["proxies"]["http"]["port"]
    images, labels = load_digits(return_X_y=True)
    test_images, test_labels = images[1500:], labels[1500:]     # not seen in training
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        answers = [client.post("/digits", json={"pixels": x.tolist()}).json()
                   for x in test_images[:20]]
    print("HTTP:", [a["digit"] for a in answers])
    predicted = handle.predict.remote(test_images).result()     # NumPy in, a list out
    accuracy = float(np.mean(np.asarray(predicted) == test_labels))
    print(f"handle: accuracy {accuracy:.3f} on {len(test_labels)} held-out images")
    assert accuracy > 0.9
    fleet.shutdown()
