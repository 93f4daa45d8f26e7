# expect: python.process
import importlib
name = 'subprocess'
mod = importlib.import_module(name.strip())
mod.run(['id'])
