"""L0. What a run is set to: `settings` (flags over SEARCHENGINE_* over defaults, and every
derived default decided once), `devices` (what depends on a GPU or a CPU), `datadir`."""
