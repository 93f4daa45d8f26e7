# expect: python.dynamic-code
import pdb
pdb.run('print(1)')
