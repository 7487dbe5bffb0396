# certgate: the two set-up commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
SYSDEPS = openssl curl haproxy stunnel4 postgresql softhsm2 rsyslog rsyslog-openssl systemd chromium scep dnsmasq-base bind9-dnsutils krb5-kdc krb5-admin-server krb5-user krb5-k5tls

.PHONY: demo test lint unit bench bench-smoke sysdeps venv clean

$(BIN)/.installed: pyproject.toml
	@# Debian's own python3 needs python3-venv (ensurepip) to create a virtualenv.
	$(PYTHON) -c "import ensurepip" 2>/dev/null || bash scripts/install-sysdeps.sh python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

sysdeps:
	bash scripts/install-sysdeps.sh $(SYSDEPS)

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

unit: venv
	$(BIN)/pytest -q -m "not integration"

# Three workers on two cores: most scenario tests wait on real processes, not the CPU;
# --dist loadfile keeps each module (and its module-scoped cluster) on one worker.
test: sysdeps venv lint
	$(BIN)/pytest -q -n 3 --dist loadfile

demo: venv
	bash scripts/install-sysdeps.sh openssl curl
	$(BIN)/certgate demo

bench: sysdeps venv
	$(BIN)/python bench/run.py

bench-smoke: venv
	$(BIN)/python bench/run.py --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
