"""Conversion tests that need torchvision (and timm): run in the tox env that has them
(``train``), not in ``models``, whose torch has no torchvision."""
