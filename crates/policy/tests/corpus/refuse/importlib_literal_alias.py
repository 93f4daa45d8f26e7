# expect: python.process
from importlib import import_module as im
im('os').popen('id')
