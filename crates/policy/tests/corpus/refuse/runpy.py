# expect: python.dynamic-code
import runpy
runpy.run_path('payload.py')
