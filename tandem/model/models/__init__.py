"""One module per model family; ``tandem/model/registry.py`` maps architecture names to them."""
