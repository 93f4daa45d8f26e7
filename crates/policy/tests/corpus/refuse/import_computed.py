# expect: python.process
m = __import__('o' + chr(115))
m.system('id')
