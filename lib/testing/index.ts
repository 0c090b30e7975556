export { storeContract, type StoreCheck, type StoreContractOptions } from './store-contract.js';
