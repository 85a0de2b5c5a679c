# examples/models_digits.py
"""A scikit-learn classifier trained at start-up on its bundled digits data, served
under the Open Inference Protocol over REST and gRPC, and called through a handle."""

import httpx
import numpy as np
import tritonclient.grpc as triton_grpc
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import fleet


@fleet.deployment(num_replicas=2)
@fleet.oip.model(name="digits", version="1",
                 inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 64]}],
                 outputs=[{"name": "digit", "datatype": "INT64", "shape": [-1]},
                          {"name": "confidence", "datatype": "FP32", "shape": [-1]}])
class DigitClassifier:
    def __init__(self) -> None:
        images, labels = load_digits(return_X_y=True)      # 1797 8x8 images, no download
        self.model = LogisticRegression(max_iter=2000).fit(images[:1500], labels[:1500])

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probs = self.model.predict_proba(inputs["image"])  # a (rows, 64) float32 array
        return {"digit": probs.argmax(axis=1), "confidence": probs.max(axis=1)}


if __name__ == "__main__":
    fleet.start(http_options={"port": 0}, grpc_options={"port": 0})
    handle = fleet.run(DigitClassifier.bind(), name="digits", route_prefix="/digits")
    ports = {kind: p["port"] for kind, p in fleet.status()["proxies"].items()}
    images, labels = load_digits(return_X_y=True)
    test_images, test_labels = images[1500:], labels[1500:]     # not seen in training

    # REST, as any v2 client sends it (the /v2 routes live at the proxy's root)
    request = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [20, 64],
                           "data": test_images[:20].tolist()}]}
    reply = httpx.post(f"http://127.0.0.1:{ports['http']}/v2/models/digits/infer",
                       json=request, timeout=30).json()
    print("REST:", reply["outputs"][0]["data"])

    # gRPC with a stock client (tritonclient)
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    image = triton_grpc.InferInput("image", list(test_images.shape), "FP32")
    image.set_data_from_numpy(test_images.astype(np.float32))
    digits = client.infer("digits", [image]).as_numpy("digit")
    client.close()
    accuracy = float(np.mean(digits == test_labels))
    print(f"gRPC: accuracy {accuracy:.3f} on {len(test_labels)} held-out images")
    assert accuracy > 0.9

    # a handle passes the same dict of arrays
    out = handle.remote({"image": test_images[:3].astype(np.float32)}).result()
    print("handle:", out["digit"].tolist(), "expected", test_labels[:3].tolist())
    fleet.shutdown()
