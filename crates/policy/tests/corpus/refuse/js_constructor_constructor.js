// expect: javascript.dynamic-code
[].constructor.constructor('return process')().mainModule;
