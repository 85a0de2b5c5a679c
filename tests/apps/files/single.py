"""One application: `fleet run path/to/single.py` serves it without naming it."""

import fleet


@fleet.deployment
class Single:
    def __call__(self, request) -> str:
        return "single file"


app = Single.bind()
