"""Model registry: `create_model(name, num_classes=..., **kw)`; each family registers itself."""
from imgcls.models.registry import create_model, list_models, register_model

# Importing the families fills the registry.
from imgcls.models import cnn, resnet, resnet_d, timm_bridge  # noqa: F401,E402

__all__ = ["create_model", "list_models", "register_model"]
