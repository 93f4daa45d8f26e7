# expect: python.process
__builtins__.__dict__['__import__']('os').system('id')
