"""Registers the DuckDB spatial extension bundled in the emulator's virtualenv, so the emulator starts offline.

Usage: python devtools/register_duckdb_spatial.py HOME_DIR   (run with the emulator virtualenv's python)
DuckDB keeps installed extensions under $HOME/.duckdb; the emulator is then started with HOME=HOME_DIR.
"""

import os
import sys
from pathlib import Path

import duckdb
import duckdb_extension_spatial

home = Path(sys.argv[1]).resolve()
home.mkdir(parents=True, exist_ok=True)
os.environ["HOME"] = str(home)
found = sorted(Path(duckdb_extension_spatial.__file__).parent.glob("extensions/*/spatial.duckdb_extension"))
if not found:
    sys.exit("duckdb-extension-spatial ships no spatial.duckdb_extension file")
con = duckdb.connect(config={"extension_directory": str(home / ".duckdb" / "extensions")})
con.execute(f"INSTALL '{found[-1]}'")
print(f"DuckDB spatial extension registered under {home}")
