"""regionspot: recognise any region with frozen SAM + frozen CLIP and a small trained fusion head.

Exports are lazy (PEP 562): `import regionspot` loads nothing heavy, and importing one
sub-package (say `regionspot.train`) never pulls in the backbones of another.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "RegionSpotHead": "regionspot.models.head",
    "RegionPredictor": "regionspot.predict.predictor",
    "Region": "regionspot.predict.predictor",
    "RegionSpotError": "regionspot.errors",
    "ImageRecord": "regionspot.data.records",
    "ShardSet": "regionspot.shards.shardset",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regionspot' has no attribute {name!r}")


def __dir__():
    return __all__
