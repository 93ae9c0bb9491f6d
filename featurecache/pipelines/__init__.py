"""Declarative runs: a TOML file drives the stages' API functions (:mod:`.run`), and the demo (:mod:`.demo`)."""
