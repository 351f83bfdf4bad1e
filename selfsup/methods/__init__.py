"""SSL methods: a plain registry from name to class (see base.py for the interface)."""

from selfsup.methods.base import Method
from selfsup.methods.dino import DINO
from selfsup.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
    "dino": DINO,
}
