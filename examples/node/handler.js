// Handler mode: the wrapper calls this function and writes its return value.
'use strict';

module.exports = async (input) => {
  if (!Array.isArray(input?.numbers)) {
    throw new Error('expected an input like {"numbers": [1, 2, 3]} (pass --input)');
  }
  return { sum: input.numbers.reduce((a, b) => a + b, 0) };
};
