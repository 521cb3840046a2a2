// Handler mode: the wrapper calls this function and writes its return value.
'use strict';

module.exports = async (input) => ({ sum: input.numbers.reduce((a, b) => a + b, 0) });
