"""SSL methods: a plain registry from name to class (see base.py for the interface)."""

from selfsup.methods.barlowtwins import BarlowTwins
from selfsup.methods.base import Method
from selfsup.methods.beit import BEiT
from selfsup.methods.byol import BYOL
from selfsup.methods.deepclusterv2 import DeepClusterV2
from selfsup.methods.dino import DINO
from selfsup.methods.dinov2 import DINOv2
from selfsup.methods.distill import Distill
from selfsup.methods.ijepa import IJEPA
from selfsup.methods.mae import MAE
from selfsup.methods.maskfeat import MaskFeat
from selfsup.methods.mocov2 import MoCoV2
from selfsup.methods.mocov3 import MoCoV3
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simmim import SimMIM
from selfsup.methods.simsiam import SimSiam
from selfsup.methods.swav import SwAV
from selfsup.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "swav": SwAV,
    "deepclusterv2": DeepClusterV2,
    "byol": BYOL,
    "simsiam": SimSiam,
    "dino": DINO,
    "dinov2": DINOv2,
    "barlowtwins": BarlowTwins,
    "vicreg": VICReg,
    "mae": MAE,
    "simmim": SimMIM,
    "beit": BEiT,
    "maskfeat": MaskFeat,
    "ijepa": IJEPA,
    "distill": Distill,
}
