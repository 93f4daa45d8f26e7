// expect: javascript.dynamic-code
setTimeout("console.log('later')", 0);
