# expect: python.dynamic-code
exec("import os; os.system('id')")
