"""tandem inside other serving systems: ``tandem.integrations.ray`` (Ray Serve). Each module needs
its system's package (an optional extra: ``pip install tandem-llm[ray]``) and is imported only by
whoever uses it."""
