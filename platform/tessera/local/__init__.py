"""The embedded mode: `tessera run` turns a FineTuneJob into a published adapter on one machine."""
