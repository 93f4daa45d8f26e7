# expect: python.process
import builtins
builtins.__import__('os').popen('id').read()
