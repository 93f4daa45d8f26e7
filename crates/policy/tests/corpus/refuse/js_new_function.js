// expect: javascript.dynamic-code
new Function('return 1 + 1')();
