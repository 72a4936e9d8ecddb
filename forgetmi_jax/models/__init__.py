"""Model: ResNet image encoder, BERT text encoder, MAG fusion, late-fusion classifier."""
from forgetmi_jax.models.bert import (BertConfig, BertModel, bert_block_names,
                                      convert_hf_state_dict, from_pretrained,
                                      load_bert_params_into, load_tokenizer, read_hf_weights)
from forgetmi_jax.models.fusion import MAG
from forgetmi_jax.models.interop import (load_reference_checkpoint, save_reference_checkpoint,
                                         state_dict_to_variables, variables_to_state_dict)
from forgetmi_jax.models.multimodal import (ModelOutputs, MultimodalModel, build_model,
                                            init_variables)
from forgetmi_jax.models.resnet import (ResNetEncoder, adaptive_avg_pool, resnet_block_names,
                                        resnet_preset)
