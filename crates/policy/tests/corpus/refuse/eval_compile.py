# expect: python.dynamic-code
code = open('x.py').read()
eval(compile(code, 'x', 'exec'))
