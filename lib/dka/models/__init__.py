"""Every network dka builds, by name: the paper's ResNet family and the related methods' models (CoDA-Nets).

    >>> from dka.models import build, list_models
    >>> model = build("res18-d5a", num_classes=365, stem="imagenet", width=64)

`list_models()` gives the accepted name forms; `parse_name` what a name asks for; `load_model` rebuilds a
trained network from its checkpoint. Families register themselves in their own modules
(`dka.models.resnet`, `dka.models.coda`; the related methods `dka.models.icnn`, `dka.models.decouple`)
through `dka.models._registry.register_model`.
"""

from dka.models._factory import load_model
from dka.models._registry import ModelSpec, build, list_models, parse_name, register_model
from dka.models.resnet import STEMS, DKAResNet  # noqa: I001 - registration order is list_models() order
from dka.models.coda import CoDANet
from dka.models.icnn import ICNNResNet  # registers res18-icnn
from dka.models.decouple import DecoupledResNet  # registers res18-decouple

__all__ = ["build", "list_models", "parse_name", "load_model", "register_model", "ModelSpec", "DKAResNet", "CoDANet",
           "STEMS", "ICNNResNet", "DecoupledResNet"]
