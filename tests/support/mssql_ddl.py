"""The official client's own SQL Server DDL for DAP schemas, driven without a server.

Usage: mssql_ddl.py NAMESPACE SCHEMA_FILE...  (files as `dap schema` writes them)
Prints what the official client's generator (pysqlsync's MSSQLGenerator, with the options the
official client passes) creates for those tables and the bookkeeping tables on an empty database.
"""
import json, sys, glob, os, types
# The generator needs only pyodbc's constants (for parameter binding, not for DDL), and pyodbc
# needs an ODBC driver manager this machine has not: a stand-in module answers the constants.
stub = types.ModuleType("pyodbc")
stub.__getattr__ = lambda name: 0
sys.modules["pyodbc"] = stub
from pysqlsync.base import GeneratorOptions
from pysqlsync.formation.mutation import MutatorOptions
from pysqlsync.model.data_types import *
from pysqlsync.formation.py_to_sql import StructMode
from dap.replicator import canvas, canvas_logs, catalog, meta_schema, new_quizzes
from dap.replicator.sql_op import create_table_dataclass, get_module_for_namespace
try:
    from pysqlsync.dialect.mssql.generator import MSSQLGenerator
except Exception as e:
    print("import failed:", e, file=sys.stderr); raise
ns = sys.argv[1]
files = sys.argv[2:]
module = get_module_for_namespace(ns)
for f in files:
    env = json.load(open(f))
    table = os.path.basename(f).split("_schema_version_")[0].removesuffix(".json")
    create_table_dataclass(table, module, env.get("schema", env) if "properties" not in env else env)
opts = GeneratorOptions(struct_mode=StructMode.JSON, foreign_constraints=False,
    namespaces={meta_schema: "instructure_dap", canvas: "canvas", canvas_logs: "canvas_logs", catalog: "catalog", new_quizzes: "new_quizzes"},
    synchronization=MutatorOptions(allow_drop_enum=False, allow_drop_struct=False, allow_drop_table=False, allow_drop_namespace=False))
gen = MSSQLGenerator(opts)
print(gen.create(modules=[meta_schema, module]))
