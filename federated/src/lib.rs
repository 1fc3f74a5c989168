//! Federated learning for agentmesh: models, local training, robust aggregation
//! and differential privacy. Pure computation: no networking, no async.
//!
//! placeholder
#![deny(missing_docs)]

mod aggregate;
mod attack;
mod checkpoint;
mod data;
mod model;
mod npy;
mod partition;
mod privacy;
mod simulate;
mod trainer;

pub use aggregate::{
    validate, Aggregate, AggregateError, Aggregator, RejectReason, Rejection, Update, ValidUpdates,
    Validated,
};
pub use attack::{alie_z_max, Attack};
pub use checkpoint::{
    decode as decode_params, encode as encode_params, load_update, save_update, CheckpointError,
    Content, MAX_MODEL_FILE_SIZE,
};
pub use data::{DataError, Dataset, Standardizer, MAX_CLASSES, MAX_FEATURES};
pub use model::{
    Architecture, Evaluation, Model, ModelError, Sgd, TensorSpec, MAX_HIDDEN_LAYERS, MAX_PARAMS,
};
pub use npy::{read_npy, write_npy, NpyError, MAX_NPY_ELEMENTS};
pub use partition::{partition, write_shards, Partition};
pub use privacy::{
    add_gaussian_noise, clip_l2, default_orders, epsilon_from_rdp, l2_norm, poisson_gaussian_rdp,
    AccountantError, AdaptiveClipping, DpConfig, NoiseMode, PrivacyBudget, PrivacyError,
    RdpAccountant,
};
pub use simulate::{simulate, Attackers, RoundMetrics, SimulationConfig, SimulationError};
pub use trainer::{
    DpSgd, ExternalTrainer, LocalTrainer, TrainConfig, TrainError, TrainOutput, Trainer,
    EXTERNAL_PROTOCOL_VERSION, MAX_RESULT_SIZE,
};
