"""timm entrypoints, one module per family, named as the family (timm's ``list_models(module=...)``)."""
