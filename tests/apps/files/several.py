"""Two applications: `fleet run path/to/several.py` asks which one."""

import fleet


@fleet.deployment
class One:
    def __call__(self, request) -> str:
        return "one"


first = One.bind()
second = One.options(name="Two").bind()
