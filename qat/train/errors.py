"""``ConfigError``, in a module of its own: parts of the trainer that must import without Hydra or
OmegaConf (the optimizers, which the GPU check uses) raise it too."""


class ConfigError(ValueError):
    """A config value that cannot work, caught before training starts."""
