# The README's two commands: `make demo` (the main job, embedded) and `make test` (the whole suite).
.PHONY: setup demo test lint crds

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

lint:
	python3 -m ruff check .

test: setup lint
	PATH="$(CURDIR)/.tools/bin:$$PATH" python3 -m pytest -q -p no:cacheprovider

crds:
	tessera crds > charts/tessera/crds/tessera.dev_crds.yaml
