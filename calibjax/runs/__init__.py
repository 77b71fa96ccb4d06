"""The methods of the command line, one module each, on the shared run core (`calibjax.runs.core`).

Each method module exposes `run(config, workdir) -> results`. Only this package, `calibjax.build` and
`calibjax.main` know about workdirs, checkpoints, progress bars and results files; the libraries never import them.
"""
