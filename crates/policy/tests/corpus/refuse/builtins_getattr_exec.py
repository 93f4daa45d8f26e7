# expect: python.dynamic-code
getattr(__builtins__, 'ex' + 'ec')('print(1)')
