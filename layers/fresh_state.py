"""``KeepsFreshState``: a module of a quantized layer that a float layer's state_dict knows nothing of."""
from __future__ import annotations

from torch import nn


class KeepsFreshState(nn.Module):
    """Loading a float layer's state_dict into a quantized layer (the drop-in contract) leaves this
    module's own parameters and buffers at their fresh initialisation: a state_dict with no entry
    under the module's prefix is skipped, not reported as missing keys. A state_dict that has some
    of its entries must have all of them (strict loading still names the missing ones)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not any(key.startswith(prefix) for key in state_dict):
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
