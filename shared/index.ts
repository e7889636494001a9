export * from './errors.js';
export * from './envelope.js';
export * from './schemas/common.js';
export * from './schemas/auth.js';
export * from './schemas/org.js';
export * from './schemas/sandbox.js';
export * from './schemas/exec.js';
export * from './schemas/image.js';
