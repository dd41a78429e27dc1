"""The sweep files shipped with calibjax (package data ``calibjax.sweeps``, from the repository's
``sweeps/`` folder): ``calibjax sweeps`` lists them, ``calibjax init NAME`` copies one to edit."""
