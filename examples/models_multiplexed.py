# examples/models_multiplexed.py
"""Several scikit-learn models behind one deployment, chosen per request by id; each
replica holds at most two and requests go to a replica that holds theirs."""

import httpx
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier
from starlette.requests import Request

import fleet

MODELS = {
    "logistic": lambda: LogisticRegression(max_iter=2000),
    "knn": lambda: KNeighborsClassifier(n_neighbors=3),
    "tree": lambda: DecisionTreeClassifier(random_state=0),
}


@fleet.deployment(num_replicas=2)
class Digits:
    def __init__(self) -> None:
        self.images, self.labels = load_digits(return_X_y=True)

    @fleet.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        if model_id not in MODELS:
            raise KeyError(f"no model {model_id!r}; there are {sorted(MODELS)}")
        return MODELS[model_id]().fit(self.images[:1500], self.labels[:1500])

    async def __call__(self, request: Request) -> dict:
        model = await self.get_model(fleet.get_multiplexed_model_id())
        pixels = np.asarray((await request.json())["pixels"], dtype=np.float64)
        return {"model": fleet.get_multiplexed_model_id(),
                "digit": int(model.predict(pixels.reshape(1, 64))[0])}


if __name__ == "__main__":
    fleet.start(http_options={"port": 0})
    handle = fleet.run(Digits.bind(), name="digits", route_prefix="/digits")
    port = fleet.status()["proxies"]["http"]["port"]
    images, labels = load_digits(return_X_y=True)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for model_id in ["logistic", "knn", "tree"] * 3:
            answer = client.post("/digits", json={"pixels": images[1600].tolist()},
                                 headers={"serve_multiplexed_model_id": model_id}).json()
            print(answer, "expected", labels[1600])
    # the same from Python: the dict reaches __call__ as a request whose json() it is
    knn = handle.options(multiplexed_model_id="knn")
    print(knn.remote({"pixels": images[1601].tolist()}).result(), "expected", labels[1601])
    for replica in fleet.status()["applications"]["digits"]["deployments"]["Digits"][
            "replicas"]:
        print(replica["replica_id"], [m["model_id"] for m in replica.get("models", [])])
    fleet.shutdown()
