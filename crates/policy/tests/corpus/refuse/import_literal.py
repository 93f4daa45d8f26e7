# expect: python.process
__import__('subprocess').run(['id'])
