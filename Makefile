# Everyday commands; each runs in the active virtual environment (see README.md for the set-up line).
.PHONY: test lint format typecheck docs bench

test:            ## the test suite, as CI runs it
	python -m pytest -q

lint:            ## ruff (style, imports, bugbear, pyupgrade) and clang-format over csrc/, nothing rewritten
	ruff check .
	ruff format --check .
	clang-format --dry-run --Werror $$(git ls-files 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.h')

format:          ## rewrite the tree in the house style
	ruff check --fix .
	ruff format .
	clang-format -i $$(git ls-files 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.h')

typecheck:       ## mypy over the package ([tool.mypy] in pyproject.toml)
	mypy

docs:            ## the docs site, warnings as errors, into site/
	mkdocs build --strict

bench:           ## every benchmark family on this machine's CPU
	rlhf-fast bench --device cpu
